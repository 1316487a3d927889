from grape_cli.cli import main

main()
