import sys

from vocabseg.cli import main

sys.exit(main())
