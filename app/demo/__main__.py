"""`python -m app.demo [DATA_DIR] [--rebuild]`: build (or check) the embedded demo pair."""

from __future__ import annotations

import argparse

from app.demo.build import ensure_demo_pair


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app.demo", description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", nargs="?", default="data", help="DATA_DIR to build under (default: data)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild even if a valid copy exists")
    args = parser.parse_args(argv)
    paths = ensure_demo_pair(args.data_dir, rebuild=args.rebuild)
    print(paths.root)


if __name__ == "__main__":
    main()
