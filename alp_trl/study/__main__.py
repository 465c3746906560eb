"""`python -m alp_trl.study ...`, the same as `alp-trl study ...`."""

from . import main


if __name__ == "__main__":
    main()
