from bin_counter.cli import main

main()
