"""The WireKube lab: real control plane, real NATs, real agents on one Linux machine."""
