"""``python -m difill.service``: the same as ``difill serve-model`` (without the global options)."""

import argparse
import logging
import sys

from difill.service import add_arguments, main

parser = argparse.ArgumentParser(prog="python -m difill.service", description="difill's HTTP inference service")
parser.add_argument("--model", help="model directory (default: the bundled model)")
parser.add_argument("--log-level", default="WARNING")
add_arguments(parser)
arguments = parser.parse_args()
logging.basicConfig(level=getattr(logging, arguments.log_level.upper(), logging.WARNING))
sys.exit(main(arguments))
