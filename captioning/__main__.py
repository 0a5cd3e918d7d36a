"""`python -m flowcurate.captioning IMAGE ...`: caption image files with the configured VLM (the stage `flowcurate
run` runs on every kept image), to try a model or a prompt before a pipeline run.

    python -m flowcurate.captioning photo.jpg --config tiny
    python -m flowcurate.captioning a.jpg b.png --model llava-hf/llava-1.5-7b-hf --prompt "Describe this image." --device cuda
"""

import argparse
import sys

from flowcurate.formats.args import ArgumentParser


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m flowcurate.captioning", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--config", default="sd3", help="preset (sd3, the default; tiny: offline) or TOML: [models] captioner, [pipeline] caption_*")
    p.add_argument("--model", default=None, help="a hub id or folder (overrides the config's captioner)")
    p.add_argument("--prompt", default=None, help="overrides [pipeline] caption_prompt")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repo's own code (only if you trust it)")
    args = p.parse_args(argv)

    from flowcurate.captioning.captioner import Captioner
    from flowcurate.formats.config import load_config, override
    from flowcurate.formats.images import ImageRejected, decode_image
    from flowcurate.models.locations import ModelUnavailable, check_available
    from flowcurate.models.text_encoders import quiet_hf_logging
    from flowcurate.models.tiny import resolve_tiny

    cfg = load_config(args.config)
    if args.model:
        cfg = override(cfg, "models", captioner=args.model)
    try:
        check_available(cfg, ("captioner",))
    except ModelUnavailable as e:
        print(f"python -m flowcurate.captioning: error: {e}", file=sys.stderr)
        return 2
    location = resolve_tiny(cfg.models.captioner, log=lambda m: print(m, file=sys.stderr))
    quiet_hf_logging()
    cap = Captioner.load(location, revision=None if args.model else cfg.models.captioner_revision,
                         prompt=args.prompt or cfg.pipeline.caption_prompt,
                         max_new_tokens=args.max_new_tokens or cfg.pipeline.caption_max_new_tokens,
                         trust_remote_code=args.trust_remote_code or cfg.models.trust_remote_code, device=args.device)
    rc = 0
    for path in args.images:
        try:
            with open(path, "rb") as fh:
                img = decode_image(fh.read()).image
        except (OSError, ImageRejected) as e:
            print(f"{path}\t(error: {e})", file=sys.stderr)
            rc = 1
            continue
        (c,) = cap.caption([img], [None])
        notes = f"\t[{', '.join(c.notes)}]" if c.notes else ""
        print(f"{path}\t{c.text}{notes}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
