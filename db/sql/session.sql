-- What every connection of a run sets after connecting, when its options could not
-- (db.py says which client settings beat them).

-- name: pin_date_style
SET DateStyle = 'ISO, YMD';
