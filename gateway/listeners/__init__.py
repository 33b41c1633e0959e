"""Device listeners: TCP (GT06, Teltonika), UDP (Teltonika) and MQTT."""
