-- Labels (model/labels.rs), in their canonical text form `k=v,k2=v2` sorted by key; '' for none.
-- A token's are given to every instance that connects with it (`token create --label`).
ALTER TABLE tokens ADD COLUMN labels TEXT NOT NULL DEFAULT '';
-- An instance's as of its latest Hello: its own (WAYPOST_LABELS) merged with its token's.
ALTER TABLE instances ADD COLUMN labels TEXT NOT NULL DEFAULT '';
