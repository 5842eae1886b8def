"""`python -m launcher ...` (and `accelerate launch -m launcher ...`): see launcher.cli."""

from launcher.cli import main

if __name__ == "__main__":
    main()
