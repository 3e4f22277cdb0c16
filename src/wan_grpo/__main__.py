import sys

from wan_grpo.cli import main

sys.exit(main())
