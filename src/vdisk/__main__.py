from vdisk.cli.main import main

raise SystemExit(main())
