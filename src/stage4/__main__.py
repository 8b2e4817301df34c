from stage4.cli import main

main()
