"""One-off probe: what reading the kept gates' gradients from the parameter gradients would save.

A gate that is exactly 1 contributes ``dL/dg_j = sum_i W_ij dL/dW_ij`` (a channel: its column or row of ``W``, and
its bias entry) or ``s_i dL/ds_i`` (a singular group), all from gradients backward computes anyway. This prototype
reads them in post-accumulate-grad hooks (before the Trainer would clip) and lets a scored step skip the gate leaves;
it profiles one MiniLM step that way against the library's gated scoring and an unscored step, as
scripts/bench_step_profile.py does. Behind the figures in docs/cost.md (`Where a step's time goes`):

    python scripts/probes/gate_grads_from_params.py --seq_len 12
    python scripts/probes/gate_grads_from_params.py --seq_len 64
    python scripts/probes/gate_grads_from_params.py --check   # the same gate and parameter gradients as gated
"""
import argparse
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "scripts"))
sys.path.insert(0, REPO)
import bench_step_profile as profile  # noqa: E402

from rankdyna_trainer.methods.rankdyna import gated_layers  # noqa: E402
from rankdyna_trainer.methods.rankdyna import layer as layer_module  # noqa: E402
from rankdyna_trainer.methods.rankdyna.layer import ChannelGatedLinear, OutputGatedLinear, SVDLinear  # noqa: E402

library_gate_for_forward = layer_module.gate_for_forward


def gate_for_forward(module, kept_only=False):
    # A layer whose hooks read its gate gradient multiplies no gate where every multiply would be by one.
    if getattr(module, "gate_grad_from_params", False) and (kept_only or module.all_groups_kept):
        return None
    return library_gate_for_forward(module, kept_only)


def read_gate_grads_from_params(layer) -> None:
    if isinstance(layer, SVDLinear):
        terms = [(layer.s, lambda s, g: s * g)]
    elif isinstance(layer, ChannelGatedLinear):
        terms = [(layer.weight, lambda w, g: (w * g).sum(0))]
    elif isinstance(layer, OutputGatedLinear):
        terms = [(layer.weight, lambda w, g: (w * g).sum(1))] + ([(layer.bias, lambda b, g: b * g)] if layer.bias
                                                                 is not None else [])
    else:
        return
    parts = {}

    def hook_for(key, term):
        def hook(param):  # a running sum over micro-batches: each term is overwritten, the last one is the step's
            with torch.no_grad():
                parts[key] = term(param.detach(), param.grad)
                layer.gate_grad.copy_(torch.stack(list(parts.values())).sum(0))
        return hook

    for key, (param, term) in enumerate(terms):
        param.register_post_accumulate_grad_hook(hook_for(key, term))
    layer.gate_grad_from_params = True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kept", nargs="+", type=profile.kept_fractions, default=[(1.0, 1.0), (1.0, 0.3)])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=12)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--check", action="store_true", help="compare the gradients instead of timing")
    args = parser.parse_args()
    layer_module.gate_for_forward = gate_for_forward  # the layers' forwards look it up in their module
    if args.check:
        return check()
    ids = torch.randint(1000, 20000, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 2, (args.batch_size,), generator=torch.Generator().manual_seed(1))
    settings = {"dense": profile.build(None)}
    for s, c in args.kept:
        for mode in ("from parameters", "gated", "off"):
            settings[f"kept {s:g} / {c:g} ({mode})"] = built = profile.build((s, c), scoring="off" if mode == "off"
                                                                             else "on")
            if mode == "from parameters":
                for layer in gated_layers(built[0]).values():
                    read_gate_grads_from_params(layer)
    medians = profile.step_medians(settings, ids, labels, args.steps)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size} x {args.seq_len}")
    print(profile.step_table(medians))
    return 0


def check() -> int:
    """Two micro-batches accumulated, half of every layer's channels kept: the gate gradients read from the
    parameters against the gated path's, and every parameter gradient."""
    grads = {}
    for mode in ("gated", "from parameters"):
        model, _ = profile.build((1.0, 0.5))
        for module in model.modules():  # the same forward twice: no dropout
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        layers = list(gated_layers(model).values())
        if mode == "from parameters":
            for layer in layers:
                read_gate_grads_from_params(layer)
        for seed in (0, 1):
            ids = torch.randint(1000, 20000, (8, 16), generator=torch.Generator().manual_seed(seed))
            model(input_ids=ids, labels=torch.arange(8) % 2).loss.backward()
        grads[mode] = ([l.gate_grad.clone() for l in layers],
                       [p.grad.clone() for p in model.parameters() if p.grad is not None])
    (gates, params), (read, read_params) = grads["gated"], grads["from parameters"]
    relative = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(read, gates))
    same = len(params) == len(read_params) and all(torch.equal(a, b) for a, b in zip(params, read_params))
    print(f"gate gradients: largest difference {relative:.1e} of a layer's largest; parameter gradients "
          f"{'bit for bit the same' if same else 'DIFFERENT'} ({len(params)} tensors)")
    return 0 if relative < 1e-5 and same else 1


if __name__ == "__main__":
    sys.exit(main())
