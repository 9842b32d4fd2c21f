"""The `onnxcut` command: a click group over one module a verb.

An OnnxcutError becomes one line on stderr and exit code 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import importlib
import logging

import click

from onnxcut.errors import OnnxcutError

# verb -> "module:function"; modules load only when their verb runs, so --help stays fast.
COMMANDS = {
    "assemble": "onnxcut.cli.assemble:assemble_cmd",
    "attribute": "onnxcut.cli.attribute:attribute_cmd",
    "distill": "onnxcut.cli.distill:distill_cmd",
    "inspect": "onnxcut.cli.inspect:inspect_cmd",
    "eval": "onnxcut.cli.eval:eval_cmd",
    "extract": "onnxcut.cli.extract:extract_cmd",
    "mask": "onnxcut.cli.mask:mask_cmd",
    "merge": "onnxcut.cli.merge:merge_cmd",
    "plan": "onnxcut.cli.plan:plan_cmd",
    "report": "onnxcut.cli.report:report_cmd",
}


class UserError(click.ClickException):
    exit_code = 2


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except OnnxcutError as e:
            raise UserError(" ".join(str(e).split())) from None


@click.group(cls=LazyGroup)
@click.version_option(package_name="onnxcut")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Cut category-specific sub-networks out of exported CNNs, on the ONNX graph."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
