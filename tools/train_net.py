#!/usr/bin/env python
"""Thin wrapper, same as the ``fastreid-train`` console script:

    python tools/train_net.py --config-file configs/NFormer/demo.yml [KEY VALUE ...]
"""
import sys

from nformer_plugin.fastreid_ext.train_net import cli

if __name__ == "__main__":
    cli(sys.argv[1:])
