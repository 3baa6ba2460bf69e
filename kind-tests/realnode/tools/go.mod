module contextos/kind-tests/realnode/tools

go 1.26.0
