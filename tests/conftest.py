import os
import sys

# Make `import bmojo` work from a plain checkout (no install needed).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
