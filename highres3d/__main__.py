"""``python -m highres3d`` is the same as the ``highres3d`` command."""
from highres3d.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
