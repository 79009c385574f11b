from hf2paged.serve.command import main

main()
