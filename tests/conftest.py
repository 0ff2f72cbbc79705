import sys
from pathlib import Path

# Lets the test modules import the shared helpers in tests/_models.py.
sys.path.insert(0, str(Path(__file__).parent))
