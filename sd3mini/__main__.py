import sys

try:                    # Ctrl-C while torch is imported (the first seconds): no traceback, the usual status
    from .cli import main
except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
