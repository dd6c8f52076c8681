"""`segclip` command line: one subcommand per entry in COMMANDS."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from segclip.config import (
    ConfigError,
    MethodName,
    ProtocolName,
    available_profiles,
    config_to_yaml,
    load_config,
)


def add_config_arguments(parser: argparse.ArgumentParser, default_profile: str) -> None:
    parser.add_argument(
        "--profile",
        default=default_profile,
        help=f"profile name ({', '.join(available_profiles())}) or YAML path "
        f"(default: {default_profile})",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.field=value",
        help="dotted overrides, e.g. model.num_centers=4 train.precision=bf16",
    )


def _config_command(args: argparse.Namespace) -> int:
    print(config_to_yaml(load_config(args.profile, args.overrides)), end="")
    return 0


def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="images to segment")
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="our .safetensors checkpoint, the authors' released .bin, or a profile name",
    )
    parser.add_argument(
        "--classes", required=True, help='comma-separated vocabulary, e.g. "cat,grass,sky"'
    )
    parser.add_argument(
        "--background-threshold",
        type=float,
        default=None,
        help="label pixels whose best class score is below min(T, best score in the image) "
        "as background (docs/method.md: VOC 0.8); default: every pixel gets a class",
    )
    parser.add_argument(
        "--protocol",
        default="segclip",
        choices=get_args(ProtocolName),
        help="evaluation protocol: resize, windows, prompts (default: segclip)",
    )
    parser.add_argument(
        "--method",
        default="segclip",
        choices=get_args(MethodName),
        help="segclip (the model's centers, default) or a training-free method on its CLIP tower",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:N"
    )
    parser.add_argument(
        "--output", type=Path, default=Path("predictions"), help="folder for the PNGs"
    )


def _predict_command(args: argparse.Namespace) -> int:
    from segclip.eval.predict import predict_images  # torch and open_clip only when needed

    classes = [name.strip() for name in args.classes.split(",") if name.strip()]
    if not classes:
        raise ConfigError("--classes must name at least one class")
    for label_path, overlay_path in predict_images(
        args.checkpoint,
        classes,
        args.images,
        args.output,
        background_threshold=args.background_threshold,
        protocol=args.protocol,
        method=args.method,
        device=args.device,
    ):
        print(f"{label_path}  {overlay_path}")
    return 0


def _app_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="our .safetensors checkpoint (path or URL), the authors' released .bin, or a "
        "profile name (e.g. tiny: an untrained toy model)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860; 0: any free)")
    parser.add_argument(
        "--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:N"
    )
    parser.add_argument(
        "--protocol",
        default="segclip",
        choices=get_args(ProtocolName),
        help="the form's default protocol (segclip_learned_scale for models trained from "
        "scratch, like the demo's)",
    )


def _app_command(args: argparse.Namespace) -> int:
    from segclip.app import serve_app  # torch and open_clip only when needed

    with serve_app(
        args.checkpoint,
        host=args.host,
        port=args.port,
        device=args.device,
        protocol=args.protocol,
    ) as app:
        print(f"segclip app: {app.url}  ({app.model_name}; Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("segclip app: stopped", flush=True)
    return 0


def _coco_object_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "root",
        type=Path,
        help="the coco_stuff164k folder (images/val2017, annotations/val2017 stuffthingmaps)",
    )


def _coco_object_command(args: argparse.Namespace) -> int:
    from segclip.eval.datasets import export_coco_object

    print(f"wrote {export_coco_object(args.root)} COCO-Object label maps")
    return 0


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {
    "config": Command(
        "print the resolved configuration of a profile plus overrides",
        lambda parser: add_config_arguments(parser, "paper"),
        _config_command,
    ),
    "predict": Command(
        "segment images with any vocabulary; writes a label PNG and an overlay per image",
        _predict_arguments,
        _predict_command,
    ),
    "app": Command(
        "a local web page: upload an image, name classes, see the segmentation overlay",
        _app_arguments,
        _app_command,
    ),
    "convert-coco-object": Command(
        "write COCO-Object (81-class) label maps from COCO-Stuff-164k val annotations",
        _coco_object_arguments,
        _coco_object_command,
    ),
}


def build_parser(commands: dict[str, Command]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segclip",
        description="SegCLIP: open-vocabulary semantic segmentation from image-text pairs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in commands.items():
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: list[str] | None = None, commands: dict[str, Command] | None = None) -> int:
    """Run one command; the pipeline commands are added by flows.cli, the installed entry point."""
    commands = commands or COMMANDS
    args = build_parser(commands).parse_args(argv)
    try:
        return commands[args.command].run(args)
    except (ConfigError, FileNotFoundError, ConnectionError, ValueError) as error:
        print(f"segclip {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
