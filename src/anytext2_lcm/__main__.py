"""``python -m anytext2_lcm`` = the ``anytext2-lcm`` command."""

import sys

from anytext2_lcm.cli import main

sys.exit(main())
