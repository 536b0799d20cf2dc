from triptych.node import main

main("denoiser")
