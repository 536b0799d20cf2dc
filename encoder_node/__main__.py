from triptych.node import main

main("encoder")
