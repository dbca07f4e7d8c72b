"""Export: pure pack/unpack functions and the deployable formats built on them."""
