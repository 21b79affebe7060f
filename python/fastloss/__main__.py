"""``python -m fastloss info``: print how fastloss was built."""

import sys

import torch


def main(argv: list[str]) -> int:
    usage = "usage: python -m fastloss info\n\nPrints how fastloss was built and what its kernels use here."
    if argv in (["-h"], ["--help"]):
        print(usage)
        return 0
    if argv not in ([], ["info"]):
        print(usage.splitlines()[0], file=sys.stderr)
        return 2
    import fastloss

    info = fastloss.build_info()
    rows = [
        ("fastloss", info["version"]),
        ("torch", torch.__version__),
        ("CUDA kernels built", "yes" if info["cuda"] else "no"),
        ("CUDA archs", info["cuda_archs"] or "-"),
        ("CUDA device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none"),
        ("CPU kernels ISA", info["cpu_isa"]),
        ("CPU log-Bessel", info["log_bessel_cpu"]),
        ("CPU bfloat16 LM head", info["linear_cross_entropy_cpu_bf16"]),
        ("CPU threads", str(info["num_threads"])),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
