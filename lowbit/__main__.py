"""``python -m lowbit ...`` (and ``accelerate launch -m lowbit finetune ...``) run the CLI."""

import sys

from .cli import main

sys.exit(main())
