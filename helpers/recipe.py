"""`python -m helpers.recipe`: the command; the code is helpers.tools.recipe (a tool beside the library)."""
from .tools.recipe import main

if __name__ == "__main__":
    main()
