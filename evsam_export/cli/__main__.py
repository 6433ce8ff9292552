from evsam_export.cli import main

main()
