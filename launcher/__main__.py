"""python -m launcher {train,describe,eval,sample,export,plot,submit,resume,status,logs,stop}"""

from launcher.jobs.cli import main

if __name__ == "__main__":
    main()
