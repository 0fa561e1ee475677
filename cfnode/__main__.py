from cfnode.cli import main

main()
