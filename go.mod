module fwp

go 1.26
