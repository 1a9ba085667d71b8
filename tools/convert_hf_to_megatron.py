#!/usr/bin/env python
"""HF model directory -> megarlhf checkpoint; same as ``megarlhf convert hf-to-megatron``.

    python tools/convert_hf_to_megatron.py --hf-dir D --out C --tp 2 --pp 2 [--vpp V]
"""

import sys

from megarlhf.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "hf-to-megatron", *sys.argv[1:]]))
