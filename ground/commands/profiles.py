"""`eoedge ground check-ir IR --profile NAME`: can the device profile's runtime run this IR?

Exit 0 when every layer is one the profile runs, 1 otherwise (each offending layer named, with
its op version and why); `--json` prints the same as one object."""
from __future__ import annotations

from collections import Counter

from shared.cliutil import emit
from shared.profiles import get_profile
from ground.openvino.compat import check_ir, ir_layers


def _text(r: dict) -> str:
    head = (f"{r['ir']}: {'compatible with' if r['compatible'] else 'NOT compatible with'} {r['profile']} "
            f"(OpenVINO {r['openvino']}, opset1..opset{r['max_opset']}; {r['layers']} layers)")
    return "\n".join([head] + [f"  {p['op']:<16} {p['layer']}: {p['reason']}" for p in r["problems"]])


def cmd_check_ir(args) -> int:
    profile = get_profile(args.profile)
    layers = ir_layers(args.ir)
    problems = check_ir(args.ir, profile)
    lo, hi = profile.openvino
    ops = Counter(f"{x['type']}-{x['opset']}" for x in layers)
    result = {"ir": args.ir, "profile": profile.name, "compatible": not problems, "layers": len(layers),
              "openvino": f">={lo}" + (f",<{hi}" if hi else ""), "max_opset": profile.max_opset,
              "ops": dict(sorted(ops.items())), "problems": problems}
    emit(result, args.json, _text)
    return 0 if not problems else 1
