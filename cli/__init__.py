"""Command-line front end, installed as `onnxcut.cli`: one module a verb."""
