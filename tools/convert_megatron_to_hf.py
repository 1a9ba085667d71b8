#!/usr/bin/env python
"""megarlhf checkpoint -> HF safetensors directory; same as ``megarlhf convert megatron-to-hf``.

    python tools/convert_megatron_to_hf.py --ckpt C --out D [--dtype bf16] [--shard-size 5GB]
"""

import sys

from megarlhf.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "megatron-to-hf", *sys.argv[1:]]))
