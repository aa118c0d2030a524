"""``python -m stethoscope`` runs the same CLI as the ``stethoscope`` command."""

from stethoscope.cli import main

if __name__ == "__main__":
    main()
