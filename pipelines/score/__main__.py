"""`python -m pipelines.score`: the score job."""
import sys

from pipelines.score import main

sys.exit(main())
