"""GPU time of a profiled training step by kernel class: what each term of the step-time model
(plan/cost.py) is fitted to.

  gemm          dense GEMMs: cuBLAS (nvjet, sm90_xmma, ...) and cutlass kernels that are not grouped;
                the attention projections, dense and shared MLPs, the router, the output projection
  grouped_gemm  torch._grouped_mm: cutlass kernels over a GroupProblemShape (pointer-array dispatch) and
                its prepare_grouped_gemm_data kernels; the experts
  attention     flash/cuDNN scaled-dot-product attention, forward and backward
  optimizer     the one-pass AdamW (`adamw_master`), foreach/multi-tensor kernels and the gradient norm's
                (`lpnorm`)
  head          log-softmax and NLL (cross-entropy) over the vocabulary, forward and backward; a plain
                softmax is the router's (tokens x experts) and counts as elementwise
  elementwise   everything else: norms, rotary, activation, casts, gathers and sums of the dispatch,
                sorts, copies, fills, memcpy/memset
  idle          the window's wall time that no device event covers (host-bound gaps)

`classify` is a pure function of the kernel name (mangled or demangled), so a profile's top kernels,
saved with their names, can be re-classified offline.
"""

from __future__ import annotations

from moemesh.parallel.comm_profile import union_us

CLASSES = ("gemm", "grouped_gemm", "attention", "elementwise", "head", "optimizer")  # kernel classes
TOP_KERNELS = 12  # kernels kept by name per profile, largest time first
NAME_CHARS = 2000  # of each kept name: cutlass's mangled names carry the problem shape deep inside

# Checked in this order: a grouped cutlass kernel also says "gemm", cuDNN's SDPA kernels say "sm90".
_RULES = (
    ("optimizer", ("adamw", "multi_tensor_apply", "foreach", "lpnorm")),
    ("grouped_gemm", ("grouped", "groupproblemshape", "ptrarray")),
    ("attention", ("sdpa", "flash", "fmha", "attention")),
    ("head", ("logsoftmax", "log_softmax", "nll_loss", "cross_entropy", "crossentropy")),
    ("gemm", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "cublas", "matmul")),
)


def classify(name: str) -> str:
    """The kernel class of a device event's name (one of CLASSES)."""
    low = name.lower()
    for cls, keys in _RULES:
        if any(k in low for k in keys):
            return cls
    return "elementwise"


def class_profile(kernels, window_us: float, steps: int) -> dict:
    """Per step: milliseconds and kernel count per class, busy time (the union of the kernels' intervals)
    and idle = window - busy, and the largest kernels by name. `kernels`: (name, start_us, end_us) of
    every device event of the window (no host events, no user annotations)."""
    kernels = list(kernels)
    ms = {c: 0.0 for c in CLASSES}
    count = {c: 0 for c in CLASSES}
    by_name: dict[str, list[float]] = {}
    for name, start, end in kernels:
        cls = classify(name)
        ms[cls] += (end - start) / 1e3 / steps
        count[cls] += 1
        total = by_name.setdefault(name, [0.0, 0])
        total[0] += (end - start) / 1e3 / steps
        total[1] += 1
    busy_us = union_us((start, end) for _, start, end in kernels)
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:TOP_KERNELS]
    return {"steps": steps, "window_ms": window_us / 1e3 / steps, "busy_ms": busy_us / 1e3 / steps,
            "idle_ms": (window_us - busy_us) / 1e3 / steps, "kernels": len(kernels) / steps,
            "classes": {c: {"ms": ms[c], "kernels": count[c] / steps} for c in CLASSES},
            "top_kernels": [{"name": name[:NAME_CHARS], "class": classify(name), "ms": t, "count": n / steps}
                            for name, (t, n) in top]}
