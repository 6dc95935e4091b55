"""`python -m helpers.bench`: the command; the code is helpers.tools.bench (a tool beside the library)."""
from .tools.bench import main

if __name__ == "__main__":
    main()
