from llm_platform.cli import main

main()
