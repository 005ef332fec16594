"""``python -m megatron_merge`` is the ``megatron-merge`` command."""

import sys

from megatron_merge.cli import main

if __name__ == "__main__":
    sys.exit(main())
