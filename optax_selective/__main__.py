"""``python -m optax_selective inspect FOLDER_OR_FILE`` / ``merge OUT IN1 IN2 ...``; see
:mod:`optax_selective.adapters.cli`."""

import sys

from optax_selective.adapters.cli import main

if __name__ == "__main__":
    sys.exit(main())
