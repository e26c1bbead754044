"""python -m bench [--quick] [--only NAME ...] [--out bench/results]  (see bench/README.md)"""

from bench.run import main

raise SystemExit(main())
