from triptych.node import main

main("decoder")
