"""`python -m fastlb ...` is `fastlb ...`."""

from fastlb.cli import main

raise SystemExit(main())
