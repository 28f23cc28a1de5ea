from ernie_cli.cli import main

main()
