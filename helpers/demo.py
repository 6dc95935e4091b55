"""`python -m helpers.demo`: the command; the code is helpers.tools.demo (a tool beside the library)."""
from .tools.demo import main

if __name__ == "__main__":
    main()
