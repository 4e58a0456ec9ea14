"""`afina studio`: the whole flow (data -> recipe -> prepare -> train -> eval -> export -> chat -> next data)
in one local web app. It writes recipes and starts the same stage commands as the CLI; it has no stage code
of its own."""
