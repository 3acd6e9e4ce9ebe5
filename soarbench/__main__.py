from soarbench.cli import main

main()
